"""Training: recipe config, collator, shared-prefix loss, callbacks, the trainer."""
