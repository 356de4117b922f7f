"""The experiments against fine-tuning and other baselines (``linadapt experiment NAME``): one module each,
and a registry."""
