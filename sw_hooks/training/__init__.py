"""Monitoring and guarding super weights during training: the session in the core, then thin Lightning and Hugging Face adapters."""
