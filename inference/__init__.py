"""Inference strategies. Every method is an object passed to ``pr.infer`` / ``pr.fit``."""

from . import guides
from .acceptance import Acceptance
from .adapted import FullyAdapted
from .bptt import BPTT
from .ekf import ExtendedKalmanFilter, ExtendedKalmanSmoother, extended_kalman_filter
from .ekf_em import EKFEM
from .ekf_proposal import EKFProposal, Guided
from .em_common import ConvergenceRule
from .global_search import GlobalSearch
from .kalman import KalmanFilter, KalmanSmoother, kalman_filter, rts_smoother
from .kalman_em import KalmanEM
from .mcem import SAEM, MCEMState, MonteCarloEM, ParticleSchedule
from .meanfield_em import MeanFieldEM
from .msteps import AutoMStep, ClosedFormMStep, GradientMStep
from .particle_gibbs import HMCStep, ParticleGibbs
from .particle_smoother import ParticleSmoother, ffbsm, pairwise_expectations
from .pmmh import PMMH, RandomWalk
from .proposals import Auto, Bootstrap, BootstrapProposal, as_proposal
from .reference import FixedModel, LinearAR, Persistence
from .rtrl import RTRL
from .search import Recommended
from .smc import ParticleFilter, ProposalChoice, best_proposal, run_particle_filter
from .starts import FromModel, LinearStart, MultiStart, NARStart
from .svi import SVI

__all__ = ["KalmanFilter", "KalmanSmoother", "kalman_filter", "rts_smoother",
           "ParticleFilter", "run_particle_filter", "ParticleSmoother", "ffbsm", "pairwise_expectations",
           "Bootstrap", "Guided", "FullyAdapted", "Auto", "as_proposal", "best_proposal", "ProposalChoice",
           "BootstrapProposal",
           "ExtendedKalmanFilter", "ExtendedKalmanSmoother", "EKFEM", "EKFProposal", "extended_kalman_filter",
           "SVI", "guides",
           "MonteCarloEM", "KalmanEM", "MeanFieldEM", "BPTT", "RTRL", "GlobalSearch", "Persistence", "LinearAR",
           "FixedModel",
           "AutoMStep", "ClosedFormMStep", "GradientMStep", "Acceptance", "ParticleSchedule", "SAEM", "MCEMState",
           "ConvergenceRule", "FromModel", "LinearStart", "NARStart", "MultiStart", "PMMH", "RandomWalk",
           "ParticleGibbs", "HMCStep", "Recommended"]
