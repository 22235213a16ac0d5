"""The trainable and injectable modules of SpatialLock (nn.Modules only)."""
