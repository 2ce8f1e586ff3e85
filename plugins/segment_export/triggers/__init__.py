"""Triggers: what deferred export tasks wait on, on the triggerer."""
