"""report.md's verdict on a stage − SFT paired difference: one bar (SE_BAR = 3 standard errors, as
summarize's table and the README), and the words give the measured margin."""
from rlhf_ops.train.report import SE_BAR, verdict


def test_verdict_uses_the_three_se_bar_and_says_the_margin():
    assert SE_BAR == 3
    assert verdict(0.1713, 0.0068) == "PPO beats SFT by 25.2 standard errors (the bar is 3)"
    # 2.5 SE: beaten at the old two-SE bar, not at three
    assert verdict(0.025, 0.01, "GRPO") == "GRPO and SFT are not told apart (+2.5 standard errors; the bar is 3)"
    assert verdict(-0.031, 0.01, "PPO-ptx") == "PPO-ptx is worse than SFT by 3.1 standard errors (the bar is 3)"
    assert verdict(0.032, 0.01) == "PPO beats SFT by 3.2 standard errors (the bar is 3)"
    assert verdict(0.2, 0.0) == "PPO beats SFT (standard error 0)"
    assert verdict(0.0, 0.0) == "PPO and SFT are not told apart (equal on every prompt)"
