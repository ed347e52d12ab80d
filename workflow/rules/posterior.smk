# RTB fine-tuning (the GPU rule; it runs on CPU when no GPU is present) and posterior sampling.


rule finetune_posterior:
    input:
        cfg=CONFIG,
        prior="results/prior/run/final",
        sources="results/sources/sources.fits",
    output:
        directory("results/posterior/run/final"),
    params:
        # rolling step-N/ checkpoints beside the output (Snakemake deletes outputs of failed jobs)
        run_dir="results/posterior/run",
    resources:
        gpu=1,
    log:
        "logs/finetune_posterior.log",
    benchmark:
        "benchmarks/finetune_posterior.tsv"
    shell:
        "{PY} -m pipeline finetune-posterior --config {input.cfg} --prior {input.prior}"
        " --sources {input.sources} --run-dir {params.run_dir} --out {output} > {log} 2>&1"


rule sample:
    """One job per method and set: imports and model loading are paid once for many observations."""
    input:
        cfg=CONFIG,
        prior="results/prior/run/final",
        posterior="results/posterior/run/final",
        obs="results/observations/{set}",
    output:
        directory("results/posteriors/{set}/{method}"),
    params:
        n=config["calibration"]["n_samples"],
    log:
        "logs/sample/{set}_{method}.log",
    benchmark:
        "benchmarks/sample_{set}_{method}.tsv"
    shell:
        "{PY} -m pipeline sample --config {input.cfg} --method {wildcards.method}"
        " --prior {input.prior} --posterior {input.posterior} --obs {input.obs}"
        " --n {params.n} --out {output} > {log} 2>&1"
