"""The lab's analyses of looped models: the loop as a dynamical system, and scaling laws."""

from stabilitylab.analysis.lyapunov import (FiniteTimeLyapunov, LyapunovSpectrum, finite_time_lyapunov,
                                            loop_lyapunov, lyapunov_spectrum)
from stabilitylab.analysis.scaling import (CHINCHILLA, TEST_TIME_FORMS, TRAINING, UNIFIED, Allocation, Fit, Law,
                                           fit_chinchilla, fit_law, fit_test_time, fit_test_time_forms,
                                           fit_training, fit_unified, optimal_allocation)
from stabilitylab.analysis.spectra import (JacobianSpectrum, eigenvalues, jacobian_spectral_radius,
                                           loop_jacobian, spectral_norm, spectral_radius)
