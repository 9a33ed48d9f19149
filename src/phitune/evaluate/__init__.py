"""Evaluation: task metrics (metrics.py), how answers are scored (scoring.py), `phitune eval`
(runner.py), multiple choice by log-likelihood (choice.py), `phitune compare` and its report
(report.py), and the lm-evaluation-harness bridge (harness.py)."""
