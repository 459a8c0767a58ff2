"""Registry: signed, immutable model versions, their promotions, and the sync that installs them into Triton."""
