from stabilitylab.analysis.scaling import (CHINCHILLA, TEST_TIME_FORMS, TRAINING, UNIFIED, Allocation, Fit, Law,
                                           fit_chinchilla, fit_law, fit_test_time, fit_test_time_forms,
                                           fit_training, fit_unified, optimal_allocation)
