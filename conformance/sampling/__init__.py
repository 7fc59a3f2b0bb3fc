"""Sampler statistics: is a sequence of seeded draws consistent with the settings?

- stats.py   the distribution the reference's logprobs and the settings imply, support
             checks, calibrated fit tests with Holm correction
- draws.py   ways to draw N seeded samples (engine requests, batched reference)
"""
