# The `user` target: posteriors and plots for the user's own observation FITS files, one folder per
# method (`user_method`, default rtb_amortized). Point `observations:` in the config at a glob, e.g.
#   snakemake --cores 2 user --config observations='data/my_lenses/*.fits'
USER_METHOD = config.get("user_method", "rtb_amortized")


rule user:
    input:
        expand("results/user/{method}/{obs}/posterior.fits", method=USER_METHOD, obs=sorted(USER_OBS)),


rule sample_user:
    input:
        cfg=CFG_SAMPLE,
        prior="results/prior/run/final",
        posterior=rtb_posterior,
        obs=user_obs_file,
    output:
        fits="results/user/{method}/{obs}/posterior.fits",
        png="results/user/{method}/{obs}/posterior.png",
    log:
        "logs/user/{method}/{obs}.log",
    conda:
        "../../environment.yml"
    resources:
        **method_gpu_resources(),
    params:
        pipeline=pipeline_call,
        posterior=posterior_arg,
    shell:
        "{params.pipeline} sample --config {input.cfg} --method {wildcards.method}"
        " --prior {input.prior} {params.posterior} --obs {input.obs}"
        " --out-file {output.fits} --png {output.png} > {log} 2>&1"
