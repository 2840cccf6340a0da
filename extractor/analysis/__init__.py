"""Analysis of finished stores: comparing activation stores (metrics, report, figure) and contact sheets."""
