# Calibration per set (TARP, interval coverage, chi2, log Z) and the report. Both are light jobs: on a
# cluster they run beside Snakemake (localrule) instead of waiting in the queue.


rule calibrate:
    input:
        cfg=CFG_LENSING,
        obs="results/observations/{set}",
        # prior draws for the sharpness denominator (posterior std / prior std) on both sets
        prior_draws="results/observations/prior",
        posteriors=posterior_dirs,
    output:
        summary=report(
            "results/calibration/{set}/summary.json",
            caption="../report/summary.rst",
            category="Calibration",
            subcategory="{set} set",
        ),
        coverage=report(
            "results/calibration/{set}/coverage_{set}.png",
            caption="../report/coverage.rst",
            category="Calibration",
            subcategory="{set} set",
        ),
        lenses=report(
            directory("results/calibration/{set}/lenses"),
            patterns=["{name}.png"],
            caption="../report/lenses.rst",
            category="Lens figures",
            subcategory="{set} set",
        ),
    log:
        "logs/calibrate_{set}.log",
    benchmark:
        "benchmarks/calibrate_{set}.tsv"
    localrule: True
    conda:
        "../../environment.yml"
    params:
        pipeline=pipeline_call,
        outdir=lambda wildcards, output: os.path.dirname(output.summary),
    shell:
        "{params.pipeline} calibrate --config {input.cfg} --set {wildcards.set}"
        " --observations {input.obs} --posteriors {input.posteriors}"
        " --prior-samples {input.prior_draws}"
        " --out {params.outdir} > {log} 2>&1"


rule report:
    input:
        summaries=expand("results/calibration/{set}/summary.json", set=SETS),
    output:
        md="results/report.md",
        html=report(
            "results/report.html",
            caption="../report/tables.rst",
            category="Calibration",
            subcategory="Tables",
        ),
    log:
        "logs/report.log",
    localrule: True
    conda:
        "../../environment.yml"
    params:
        pipeline=pipeline_call,
    shell:
        "{params.pipeline} report --calibration results/calibration --out {output.md}"
        " --html {output.html} > {log} 2>&1"
