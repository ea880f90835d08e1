"""Multi-task weighting modules (docs/METHODS.md, sections 3 and 4).

Loss-based (``forward(losses)`` is the total loss; ``backward(losses)`` backpropagates it):
Fixed, InitialLoss, PriorLoss, RealTime, GeneralizedMean, AnchorToMain, Uncertainty, DWA, RLW,
FAMO, Alternating, STCH, IMTLL, PBI, COSMOS.

Gradient-based (take the shared parameters; ``backward(losses)`` writes sum_i c_i g_i into their
.grad through fusedmtl.multi_tensor; ``coefficients(gramian, losses)`` is the method itself):
GradNormalization, GradNorm, MGDA, PCGrad, CAGrad, IMTLG, AlignedMTL, NashMTL, UPGrad, DBMTL,
DualProj, ConFIG, Krum, FairGrad, GradVac, MoDo, SDMGrad, CRMOGM, PCD, IMTL (IMTL-L with IMTL-G);
on the gradients themselves (per coordinate, not from the Gramian alone): TrimmedMean, GradDrop,
ExcessMTL, MoCo.

    weighting = fusedmtl.weighting.MGDA(model.trunk.parameters(), tasks=["depth", "seg"])
    weighting.backward({"depth": depth_loss, "seg": seg_loss})
    optimizer.step(); optimizer.zero_grad()
"""

from fusedmtl.weighting.base import Weighting
from fusedmtl.weighting.gradient_based import GradientWeighting
from fusedmtl.weighting.loss_based import LossWeighting
from fusedmtl.weighting.methods.aligned_mtl import AlignedMTL
from fusedmtl.weighting.methods.alternating import Alternating
from fusedmtl.weighting.methods.anchor_to_main import AnchorToMain
from fusedmtl.weighting.methods.cagrad import CAGrad
from fusedmtl.weighting.methods.config import ConFIG
from fusedmtl.weighting.methods.cosmos import COSMOS
from fusedmtl.weighting.methods.crmogm import CRMOGM
from fusedmtl.weighting.methods.db_mtl import DBMTL
from fusedmtl.weighting.methods.dualproj import DualProj
from fusedmtl.weighting.methods.dwa import DWA
from fusedmtl.weighting.methods.excess_mtl import ExcessMTL
from fusedmtl.weighting.methods.fairgrad import FairGrad
from fusedmtl.weighting.methods.famo import FAMO
from fusedmtl.weighting.methods.fixed import Fixed
from fusedmtl.weighting.methods.generalized_mean import GeneralizedMean
from fusedmtl.weighting.methods.grad_normalization import GradNormalization
from fusedmtl.weighting.methods.graddrop import GradDrop
from fusedmtl.weighting.methods.gradnorm import GradNorm
from fusedmtl.weighting.methods.gradvac import GradVac
from fusedmtl.weighting.methods.imtl import IMTLG
from fusedmtl.weighting.methods.imtl_full import IMTL
from fusedmtl.weighting.methods.imtl_l import IMTLL
from fusedmtl.weighting.methods.initial_loss import (
    InitialLoss,
    initial_loss_cross_entropy,
    initial_loss_l2,
)
from fusedmtl.weighting.methods.krum import Krum
from fusedmtl.weighting.methods.mgda import MGDA
from fusedmtl.weighting.methods.moco import MoCo
from fusedmtl.weighting.methods.modo import MoDo
from fusedmtl.weighting.methods.nash_mtl import NashMTL
from fusedmtl.weighting.methods.pbi import PBI
from fusedmtl.weighting.methods.pcd import PCD
from fusedmtl.weighting.methods.pcgrad import PCGrad
from fusedmtl.weighting.methods.prior_loss import (
    PriorLoss,
    prior_loss_classification,
    prior_loss_l1,
    prior_loss_l2,
)
from fusedmtl.weighting.methods.real_time import RealTime
from fusedmtl.weighting.methods.rlw import RLW
from fusedmtl.weighting.methods.sdmgrad import SDMGrad
from fusedmtl.weighting.methods.stch import STCH
from fusedmtl.weighting.methods.trimmed_mean import TrimmedMean
from fusedmtl.weighting.methods.uncertainty import Uncertainty
from fusedmtl.weighting.methods.upgrad import UPGrad

LOSS_BASED = {
    "fixed": Fixed,
    "initial_loss": InitialLoss,
    "prior_loss": PriorLoss,
    "real_time": RealTime,
    "generalized_mean": GeneralizedMean,
    "anchor_to_main": AnchorToMain,
    "uncertainty": Uncertainty,
    "dwa": DWA,
    "rlw": RLW,
    "famo": FAMO,
    "alternating": Alternating,
    "stch": STCH,
    "imtl_l": IMTLL,
    "pbi": PBI,
    "cosmos": COSMOS,
}
GRADIENT_BASED = {
    "grad_normalization": GradNormalization,
    "gradnorm": GradNorm,
    "mgda": MGDA,
    "pcgrad": PCGrad,
    "cagrad": CAGrad,
    "imtl_g": IMTLG,
    "aligned_mtl": AlignedMTL,
    "nash_mtl": NashMTL,
    "upgrad": UPGrad,
    "db_mtl": DBMTL,
    "dualproj": DualProj,
    "config": ConFIG,
    "krum": Krum,
    "fairgrad": FairGrad,
    "gradvac": GradVac,
    "trimmed_mean": TrimmedMean,
    "graddrop": GradDrop,
    "modo": MoDo,
    "sdmgrad": SDMGrad,
    "crmogm": CRMOGM,
    "pcd": PCD,
    "excess_mtl": ExcessMTL,
    "imtl": IMTL,
    "moco": MoCo,
}

__all__ = [
    "STCH",
    "Alternating",
    "COSMOS",
    "CRMOGM",
    "ConFIG",
    "DualProj",
    "FairGrad",
    "GradVac",
    "IMTLL",
    "Krum",
    "DBMTL",
    "DWA",
    "ExcessMTL",
    "FAMO",
    "GRADIENT_BASED",
    "IMTL",
    "IMTLG",
    "LOSS_BASED",
    "MGDA",
    "MoCo",
    "MoDo",
    "SDMGrad",
    "RLW",
    "AlignedMTL",
    "AnchorToMain",
    "CAGrad",
    "Fixed",
    "GeneralizedMean",
    "GradDrop",
    "GradNorm",
    "GradNormalization",
    "GradientWeighting",
    "InitialLoss",
    "LossWeighting",
    "NashMTL",
    "PBI",
    "PCD",
    "PCGrad",
    "PriorLoss",
    "RealTime",
    "TrimmedMean",
    "UPGrad",
    "Uncertainty",
    "Weighting",
    "initial_loss_cross_entropy",
    "initial_loss_l2",
    "prior_loss_classification",
    "prior_loss_l1",
    "prior_loss_l2",
]
