"""Inference strategies. Every method is an object passed to ``pr.infer`` / ``pr.fit``."""

from .kalman import KalmanFilter, KalmanSmoother, kalman_filter, rts_smoother

__all__ = ["KalmanFilter", "KalmanSmoother", "kalman_filter", "rts_smoother"]
