# The `user` target: posteriors and plots for the user's own observation FITS files.
# Point `observations:` in the config at a glob, e.g.
#   snakemake --cores 2 user --config observations='data/my_lenses/*.fits'
rule user:
    input:
        expand("results/user/{obs}/posterior.fits", obs=sorted(USER_OBS)),


rule sample_user:
    input:
        cfg=CFG_SAMPLE,
        prior="results/prior/run/final",
        posterior="results/posterior/run/final",
        obs=user_obs_file,
    output:
        fits="results/user/{obs}/posterior.fits",
        png="results/user/{obs}/posterior.png",
    params:
        py=PY,
        method=config.get("user_method", "rtb_amortized"),
    conda:
        "../../environment.yml"
    log:
        "logs/user/{obs}.log",
    shell:
        "{params.py} -m pipeline sample --config {input.cfg} --method {params.method}"
        " --prior {input.prior} --posterior {input.posterior} --obs {input.obs}"
        " --out-file {output.fits} --png {output.png} > {log} 2>&1"
