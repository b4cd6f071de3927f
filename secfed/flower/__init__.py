"""secfed over Flower: the same run as a ServerApp/ClientApp pair (Message API).

* :mod:`secfed.flower.server` - :class:`FlowerEngine` and the ``ServerApp``;
* :mod:`secfed.flower.client` - the ``ClientApp`` a SuperNode runs for its own client;
* :mod:`secfed.flower.codec` - the bytes inside Flower messages (validated, never pickle);
* :mod:`secfed.flower.simulation` - Flower's simulation runtime on Ray;
* :mod:`secfed.flower.deploy` - certificates, partitions and a local SuperLink + SuperNodes with TLS.

Nothing here is imported by the engine; ``flwr`` is needed only when a Flower
transport is chosen (``pip install 'secfed[flower]'``).
"""
