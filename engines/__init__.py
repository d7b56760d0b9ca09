"""Pure compute of rllsm-vsim: arrays in, arrays out, on CUDA when present and on the CPU otherwise."""
