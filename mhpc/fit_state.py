"""The mergeable fit state moved to :mod:`mhpc.fit.state` (it documents the fit contract); these names
stay importable from here."""

from mhpc.fit.state import BANK_KINDS, BankState, FitState, has_fit_state

__all__ = ["BANK_KINDS", "BankState", "FitState", "has_fit_state"]
