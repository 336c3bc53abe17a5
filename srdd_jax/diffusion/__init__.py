"""The discrete-diffusion view: the scale-wise sampler, guidance, masked resampling, editing."""
