"""The inversion-beside-RTB paragraph: lens-by-lens log Z counts and who wins on which criterion."""

from pipeline.evaluation.comparison import count_higher, inversion_paragraph


def _m(err, chi, arc, c68, c95, logz):
    return {"n_obs": len(logz), "mean_err": err, "chi2_median": chi, "chi2_arc_median": arc,
            "truth_chi2_median": 1.0, "truth_chi2_arc_median": 1.1, "coverage68": c68, "coverage95": c95,
            "coverage68_ref": 0.68, "coverage95_ref": 0.92,
            "logz": [None if z is None else {"elbo": z[0], "elbo_se": 0.0, "iw": z[1]} for z in logz]}


def test_count_higher_skips_unknown_lenses():
    assert count_higher([1.0, 2.0, None, 5.0], [0.0, 3.0, 1.0, None]) == (1, 2)


def test_paragraph_counts_lenses_and_names_the_winners():
    rtb = _m(10.0, 1.3, 2.0, 0.70, 0.93, [(-120, -100), (-90, -80), (-60, -55)])
    inv = _m(14.0, 1.05, 1.2, 0.50, 0.80, [(-95, -95), (-85, -85), (-50, -50)])
    text = inversion_paragraph("heldout", {"rtb_amortized": rtb, "inversion": inv, "dps": rtb})
    assert text.startswith("**heldout**, `rtb_amortized` against `inversion` (3 lenses)")
    # inversion IW-higher on lenses 2 and 3 (-85 > -80 is False; -95 > -100, -50 > -55): 2 of 3
    assert "higher than RTB's IW estimate on 2 of 3 lenses and than its ELBO on 3 of 3" in text
    inv_part, rtb_part = text.split("The inversion wins on: ")[1].split("RTB wins on: ")
    assert "chi2_nu over the image" in inv_part and "chi2_nu in the arc" in inv_part
    # medians: the inversion's -85 against RTB's IW -80, so RTB's
    assert "RMS error" in rtb_part and "coverage" in rtb_part and "median log Z" in rtb_part


def test_no_paragraph_without_both_methods():
    m = _m(1.0, 1.0, 1.0, 0.7, 0.9, [(-1, -1)])
    assert inversion_paragraph("prior", {"rtb_amortized": m}) is None
    assert inversion_paragraph("prior", {"inversion": m, "dps": m}) is None
