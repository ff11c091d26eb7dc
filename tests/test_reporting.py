"""Energy figures are shown rounded against spikelm: its costs up, the references' down, ratios up."""

from spikelm.reporting import _down, _n, _ratio, _up, energy_summary_lines


def test_rounding_helpers_by_hand():
    assert _up(455_676.2) == "455,677" and _down(455_676.9) == "455,676" and _n(455_676.2) == "455,676"
    assert _up(0.14111) == "0.142" and _down(0.14119) == "0.141"
    assert _up(999.5) == "1,000"  # carried over into the integers' format
    assert _up(12.3) == "12.3" and _down(0.0) == "0"  # exact values are shown as they are
    assert _ratio(0.14111) == "0.142" and _ratio(0.14) == "0.140" and _ratio(0.2) == "0.200"


def test_summary_lines_round_against_spikelm():
    reference = {"label": "same-shape GPT-2 (fp32)", "precision": "fp32", "compute_pj": 3_232_701.9,
                 "memory_pj": 3_501_380.7, "total_pj": 6_734_082.6, "ac": 2567.9, "mac": 702_259.9}
    report = {"pj_per_token": 455_676.2, "ac_per_token": 306_070.1, "mac_per_token": 39_177.1, "firing_rate": 0.1221,
              "ann_pj_per_token": 3_232_701.9, "energy_ratio": 455_676.2 / 3_232_701.9, "precision": "fp32",
              "compute_pj_per_token": 455_676.2, "memory_pj_per_token": 1_589_414.1,
              "total_pj_per_token": 2_045_090.3, "references": {"gpt2_fp32": reference}}
    first, second = energy_summary_lines(report).splitlines()
    # 0.14096 of GPT-2: shown as 0.141, not 0.14; spikelm's pJ rounded up, GPT-2's down
    assert first == ("energy: 455677 pJ/token (306071 ACs + 39178 MACs per token, firing rate 0.122); "
                     "same-shape GPT-2: 3232701 pJ/token (x0.141)")
    assert second == ("with memory (operations + memory = total pJ/token): spikelm fp32 455677 + 1589415 = 2045091; "
                      "same-shape GPT-2 fp32 3232701 + 3501380 = 6734082 (2567 ACs + 702259 MACs)")
