# Calibration per set (TARP, interval coverage, chi2, log Z) and the report.


rule calibrate:
    input:
        cfg=CFG_LENSING,
        obs="results/observations/{set}",
        # prior draws for the sharpness denominator (posterior std / prior std) on both sets
        prior_draws="results/observations/prior",
        posteriors=posterior_dirs,
    output:
        summary="results/calibration/{set}/summary.json",
    params:
        py=PY,
        outdir=output_dir,
    conda:
        "../../environment.yml"
    log:
        "logs/calibrate_{set}.log",
    benchmark:
        "benchmarks/calibrate_{set}.tsv"
    shell:
        "{params.py} -m pipeline calibrate --config {input.cfg} --set {wildcards.set}"
        " --observations {input.obs} --posteriors {input.posteriors}"
        " --prior-samples {input.prior_draws}"
        " --out {params.outdir} > {log} 2>&1"


rule report:
    input:
        summaries=expand("results/calibration/{set}/summary.json", set=SETS),
    output:
        "results/report.md",
    params:
        py=PY,
    conda:
        "../../environment.yml"
    log:
        "logs/report.log",
    shell:
        "{params.py} -m pipeline report --calibration results/calibration --out {output} > {log} 2>&1"
