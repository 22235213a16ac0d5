"""Training: the shared loop, the small base (autoencoder, then U-Net) and the adapters."""
