# The config family files every rule reads (see CONFIG_FAMILIES in common.smk): written by a local rule,
# never at parse time, so a dry run changes nothing and a family's rules rerun only when it changes.


rule config_section:
    output:
        "results/config/{family}.yaml",
    log:
        "logs/config_{family}.log",
    wildcard_constraints:
        family="|".join(CONFIG_FAMILIES),
    localrule: True
    params:
        text=lambda wildcards: family_text(wildcards.family),
    run:
        write_text(output[0], params.text)
        write_text(log[0], f"wrote {output[0]}\n")
