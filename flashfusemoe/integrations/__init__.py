"""Adapters to other libraries' MoE interfaces (imported on demand: ``flashfusemoe.integrations.hf``)."""
