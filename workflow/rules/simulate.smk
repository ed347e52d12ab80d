# Lensed observations: held-out galaxies (prior misspecification included) and truths drawn from the
# trained prior's exact chain (where exact calibration is expected).


rule simulate:
    input:
        cfg=CFG_LENSING,
        sources="results/sources/sources.fits",
    output:
        directory("results/observations/heldout"),
    log:
        "logs/simulate_heldout.log",
    conda:
        "../../environment.yml"
    params:
        pipeline=pipeline_call,
        n=config["calibration"]["n_obs"],
    shell:
        "{params.pipeline} simulate --config {input.cfg} --sources {input.sources} --split TEST"
        " --n {params.n} --out {output} > {log} 2>&1"


rule simulate_prior_set:
    input:
        cfg=CFG_PRIOR_SET,
        prior="results/prior/run/final",
        sources="results/sources/sources.fits",
    output:
        directory("results/observations/prior"),
    log:
        "logs/simulate_prior_set.log",
    conda:
        "../../environment.yml"
    # draws the truths from the prior's chain
    resources:
        **gpu_resources(),
    params:
        pipeline=pipeline_call,
        n=config["calibration"]["n_obs"],
    shell:
        "{params.pipeline} simulate-prior-set --config {input.cfg} --checkpoint {input.prior}"
        " --sources {input.sources}"
        " --n {params.n} --out {output} > {log} 2>&1"
