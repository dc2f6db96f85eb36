"""The train/serve text-encoding contract: chat template, shared prefix ids, padding."""
