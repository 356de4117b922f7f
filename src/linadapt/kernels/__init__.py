"""The neural tangent kernel as a linear operator and as a GPyTorch kernel (also sharded over ranks)."""
