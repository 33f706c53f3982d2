"""Coverage-guided fuzzing of the codec: the harness, its seed corpus and its regressions."""
