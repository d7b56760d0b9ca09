"""VSI-SR: the 2-D virtual-structured-illumination super-resolution network and Step 2 (lateral isotropic SR)."""
