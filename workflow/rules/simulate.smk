# Lensed observations: held-out galaxies (prior misspecification included) and truths drawn from the
# trained prior's exact chain (where exact calibration is expected).


rule simulate:
    input:
        cfg=CFG_LENSING,
        sources="results/sources/sources.fits",
    output:
        directory("results/observations/heldout"),
    params:
        py=PY,
        n=config["calibration"]["n_obs"],
    conda:
        "../../environment.yml"
    log:
        "logs/simulate_heldout.log",
    shell:
        "{params.py} -m pipeline simulate --config {input.cfg} --sources {input.sources} --split TEST"
        " --n {params.n} --out {output} > {log} 2>&1"


rule simulate_prior_set:
    input:
        cfg=CFG_PRIOR_SET,
        prior="results/prior/run/final",
        sources="results/sources/sources.fits",
    output:
        directory("results/observations/prior"),
    params:
        py=PY,
        n=config["calibration"]["n_obs"],
    conda:
        "../../environment.yml"
    log:
        "logs/simulate_prior_set.log",
    shell:
        "{params.py} -m pipeline simulate-prior-set --config {input.cfg} --checkpoint {input.prior}"
        " --sources {input.sources}"
        " --n {params.n} --out {output} > {log} 2>&1"
