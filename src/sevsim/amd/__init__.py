"""AMD's side of the trust chain, as the simulator models it.

* ``root``: a *simulated* AMD root per generation (ARK and ASK in the AMD CA format),
  generated once per data directory and cached. Real platforms chain to AMD's real ARK;
  simulated platforms chain to these, which are labelled as simulation keys.
* ``kds``: a simulated key distribution service: given a chip ID, the ASK-signed CEK.
* ``fab``: the factory: burns a chip's fuses and registers its CEK with the KDS.
"""
