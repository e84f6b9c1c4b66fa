"""The lab's analyses of looped models: the loop as a dynamical system, and more."""

from stabilitylab.analysis.spectra import (JacobianSpectrum, eigenvalues, jacobian_spectral_radius,
                                           loop_jacobian, spectral_norm, spectral_radius)
