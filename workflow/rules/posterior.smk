# RTB fine-tuning (a GPU rule; it runs on CPU when no GPU is present) and posterior sampling.


rule finetune_posterior:
    input:
        cfg=CFG_POSTERIOR,
        prior="results/prior/run/final",
        sources="results/sources/sources.fits",
    output:
        directory("results/posterior/run/final"),
    log:
        "logs/finetune_posterior.log",
    benchmark:
        "benchmarks/finetune_posterior.tsv"
    conda:
        "../../environment.yml"
    # a GPU when it trains from the prior; continuing a shipped checkpoint is short (the default config's
    # is at its last step: the job only exports it)
    resources:
        **gpu_resources(not config.get("posterior_checkpoint")),
    params:
        pipeline=pipeline_call,
        # rolling step-N/ checkpoints beside the output (Snakemake deletes outputs of failed jobs)
        run_dir=parent_dir,
        init=finetune_init_arg,
    shell:
        "{params.pipeline} finetune-posterior --config {input.cfg} --prior {input.prior}"
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
    log:
        "logs/tune/{method}.log",
    benchmark:
        "benchmarks/tune_{method}.tsv"
    wildcard_constraints:
        method="|".join(TUNED_METHODS) or "none",
    # first among the jobs ready with it: the method's samples wait for it (tuning, then sampling, is the
    # longest chain of the DAG)
    priority: 4
    conda:
        "../../environment.yml"
    resources:
        **gpu_resources(),
    params:
        pipeline=pipeline_call,
    shell:
        "{params.pipeline} tune --config {input.cfg} --method {wildcards.method}"
        " --prior {input.prior} --obs {input.obs} --out {output} > {log} 2>&1"


rule sample:
    """One job per method and set: imports and model loading are paid once for many observations. A job
    stopped by a time limit resumes where it stopped (`sample --resume`)."""
    input:
        cfg=CFG_SAMPLE,
        prior="results/prior/run/final",
        posterior=rtb_posterior,
        obs="results/observations/{set}",
        tuning=tuning_input,
    output:
        directory("results/posteriors/{set}/{method}"),
    log:
        "logs/sample/{set}_{method}.log",
    benchmark:
        "benchmarks/sample_{set}_{method}.tsv"
    # costliest methods first, so no long job is left running alone at the end of the DAG
    priority: lambda wildcards: SAMPLE_PRIORITY.get(wildcards.method, 0)
    conda:
        "../../environment.yml"
    resources:
        **method_gpu_resources(),
    params:
        pipeline=pipeline_call,
        posterior=posterior_arg,
        n=config["calibration"]["n_samples"],
        tuning=lambda wildcards, input: f"--tuning {input.tuning}" if input.tuning else "",
        shard="",
    shell:
        "{params.pipeline} sample --config {input.cfg} --method {wildcards.method}"
        " --prior {input.prior} {params.posterior} --obs {input.obs}"
        " --n {params.n} {params.tuning} --resume {params.shard} --out {output} > {log} 2>&1"


rule sample_baseline:
    """A `baselines:` item sampled on a set: its own config, prior and posterior, the methods' sample count,
    its files labelled with its name (the calibration tables' row)."""
    input:
        cfg=baseline_path("config"),
        prior=baseline_path("prior"),
        posterior=baseline_path("posterior"),
        obs="results/observations/{set}",
    output:
        directory("results/posteriors/{set}/{baseline}"),
    log:
        "logs/sample_baseline/{set}_{baseline}.log",
    benchmark:
        "benchmarks/sample_baseline_{set}_{baseline}.tsv"
    conda:
        "../../environment.yml"
    resources:
        **gpu_resources(),
    params:
        pipeline=pipeline_call,
        method=lambda wildcards: BASELINES[wildcards.baseline].get("method", "rtb_amortized"),
        n=config["calibration"]["n_samples"],
    shell:
        "{params.pipeline} sample --config {input.cfg} --method {params.method}"
        " --prior {input.prior} --posterior {input.posterior} --obs {input.obs}"
        " --n {params.n} --label {wildcards.baseline} --resume --out {output} > {log} 2>&1"


if SAMPLE_SHARDS > 1:
    # `execution.sample_shards: N`: each method and set sampled by N jobs on contiguous shares of the
    # observations (each observation keeps its seed: the merged directory equals one job's)

    use rule sample as sample_shard with:
        output:
            directory("results/posteriors/{set}/{method}.shard/{shard}"),
        log:
            "logs/sample/{set}_{method}_{shard}.log",
        benchmark:
            "benchmarks/sample_{set}_{method}_{shard}.tsv"
        params:
            pipeline=pipeline_call,
            posterior=posterior_arg,
            n=config["calibration"]["n_samples"],
            tuning=lambda wildcards, input: f"--tuning {input.tuning}" if input.tuning else "",
            shard=lambda wildcards: f"--shard {wildcards.shard}/{SAMPLE_SHARDS}",

    rule sample_merge:
        input:
            lambda wildcards: expand(
                "results/posteriors/{set}/{method}.shard/{shard}",
                set=wildcards.set,
                method=wildcards.method,
                shard=range(SAMPLE_SHARDS),
            ),
        output:
            directory("results/posteriors/{set}/{method}"),
        log:
            "logs/sample/{set}_{method}_merge.log",
        localrule: True
        run:
            merge_directories(input, output[0], log[0])

    ruleorder: sample_merge > sample
