# RTB fine-tuning (the GPU rule; it runs on CPU when no GPU is present) and posterior sampling.


rule finetune_posterior:
    input:
        cfg=CONFIG,
        prior="results/prior/model",
    output:
        directory("results/posterior/model"),
    params:
        # rolling checkpoints outside output: (Snakemake deletes outputs of failed jobs); resumed on rerun
        run_dir="results/posterior/checkpoints",
    resources:
        gpu=1,
    log:
        "logs/finetune_posterior.log",
    benchmark:
        "benchmarks/finetune_posterior.tsv"
    shell:
        "{PY} -m pipeline finetune-posterior --config {input.cfg} --prior {input.prior}"
        " --run-dir {params.run_dir} --out {output} > {log} 2>&1"


rule sample:
    """One job per method and set: imports and model loading are paid once for many observations."""
    input:
        cfg=CONFIG,
        prior="results/prior/model",
        posterior="results/posterior/model",
        obs="results/observations/{set}",
    output:
        directory("results/posteriors/{set}/{method}"),
    log:
        "logs/sample/{set}_{method}.log",
    benchmark:
        "benchmarks/sample_{set}_{method}.tsv"
    shell:
        "{PY} -m pipeline sample --config {input.cfg} --method {wildcards.method}"
        " --prior {input.prior} --posterior {input.posterior} --obs {input.obs}"
        " --out {output} > {log} 2>&1"
