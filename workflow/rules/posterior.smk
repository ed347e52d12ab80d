# RTB fine-tuning (the GPU rule; it runs on CPU when no GPU is present) and posterior sampling.


rule finetune_posterior:
    input:
        cfg=CFG_POSTERIOR,
        prior="results/prior/run/final",
        sources="results/sources/sources.fits",
    output:
        directory("results/posterior/run/final"),
    params:
        py=PY,
        # rolling step-N/ checkpoints beside the output (Snakemake deletes outputs of failed jobs)
        run_dir=parent_dir,
        init=finetune_init_arg,
    resources:
        gpu=1,
    conda:
        "../../environment.yml"
    log:
        "logs/finetune_posterior.log",
    benchmark:
        "benchmarks/finetune_posterior.tsv"
    shell:
        "{params.py} -m pipeline finetune-posterior --config {input.cfg} --prior {input.prior}"
        " --sources {input.sources} --run-dir {params.run_dir} --out {output} {params.init}"
        " > {log} 2>&1"


rule tune:
    """A sampler's guidance scale (dps, dps_cla), tuned once on prior-predictive observations at the noise
    level of the prior-drawn set and shared by every set's sample job."""
    input:
        cfg=CFG_SAMPLE,
        prior="results/prior/run/final",
        obs="results/observations/prior",
    output:
        "results/tuning/{method}.json",
    wildcard_constraints:
        method="|".join(TUNED_METHODS) or "none",
    # first among the jobs ready with it: the method's samples wait for it (tuning, then sampling, is the
    # longest chain of the DAG)
    priority: 4
    params:
        py=PY,
    conda:
        "../../environment.yml"
    log:
        "logs/tune/{method}.log",
    benchmark:
        "benchmarks/tune_{method}.tsv"
    shell:
        "{params.py} -m pipeline tune --config {input.cfg} --method {wildcards.method} --prior {input.prior}"
        " --obs {input.obs} --out {output} > {log} 2>&1"


rule sample:
    """One job per method and set: imports and model loading are paid once for many observations."""
    input:
        cfg=CFG_SAMPLE,
        prior="results/prior/run/final",
        posterior="results/posterior/run/final",
        obs="results/observations/{set}",
        tuning=tuning_input,
    output:
        directory("results/posteriors/{set}/{method}"),
    params:
        py=PY,
        n=config["calibration"]["n_samples"],
        tuning=lambda wildcards, input: f"--tuning {input.tuning}" if input.tuning else "",
    # costliest methods first, so no long job is left running alone at the end of the DAG
    priority: lambda wildcards: SAMPLE_PRIORITY.get(wildcards.method, 0)
    conda:
        "../../environment.yml"
    log:
        "logs/sample/{set}_{method}.log",
    benchmark:
        "benchmarks/sample_{set}_{method}.tsv"
    shell:
        "{params.py} -m pipeline sample --config {input.cfg} --method {wildcards.method}"
        " --prior {input.prior} --posterior {input.posterior} --obs {input.obs}"
        " --n {params.n} {params.tuning} --out {output} > {log} 2>&1"
