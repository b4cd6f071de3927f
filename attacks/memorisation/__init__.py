"""Memorisation attacks on generative (causal-LM) fine-tuning: the secret sharer's exposure and extraction."""
