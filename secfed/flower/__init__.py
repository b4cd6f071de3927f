"""secfed over Flower: the same run as a ServerApp/ClientApp pair (Message API).

* :mod:`secfed.flower.server` - :class:`FlowerEngine` and the ``ServerApp``;
* :mod:`secfed.flower.client` - the ``ClientApp`` a SuperNode runs for its own client;
* :mod:`secfed.flower.codec` - the bytes inside Flower messages (validated, never pickle);
* :mod:`secfed.flower.simulation` - Flower's simulation runtime on Ray;
* :mod:`secfed.flower.deploy` - the Flower App, a local SuperLink + SuperNodes with TLS, ``deploy.transport``;
* :mod:`secfed.flower.worker` - secfed's SuperNode: one long-lived ClientApp for every message.

Nothing here is imported by the engine; ``flwr`` is needed only when a Flower
transport is chosen (``pip install 'secfed[flower]'``).
"""
