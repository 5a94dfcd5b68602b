//! Operating-system noise measurement: FTQ, FWQ, selfish detour, spectral analysis.
