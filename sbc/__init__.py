"""sbc: a SIP back-to-back user agent between a 3CX PBX and Retell AI voice agents."""

__version__ = "0.1.0"
