"""The lab's analyses of looped models: the loop as a dynamical system, and more."""

from stabilitylab.analysis.lyapunov import (FiniteTimeLyapunov, LyapunovSpectrum, finite_time_lyapunov,
                                            loop_lyapunov, lyapunov_spectrum)
from stabilitylab.analysis.spectra import (JacobianSpectrum, eigenvalues, jacobian_spectral_radius,
                                           loop_jacobian, spectral_norm, spectral_radius)
