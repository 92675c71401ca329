"""Pure decisions of the control plane: no Kafka, faust or aiohttp in here."""
