"""Evaluation: language-model metrics now; task metrics and reports come with the evaluation issue."""
