"""Run plumbing beside lit/: the builders of train.py, invert.py and joint runs, the Trainer
factory and launch path, the typed config sections, guards, locks and the resume check."""
