"""MSAD: Multi-Scale Aligned Distillation for Low-Resolution Detection (Qi et al., CVPR 2021),
a plain-PyTorch reference implementation on FCOS."""
