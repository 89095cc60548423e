"""The LughOS plugin registry: TUF metadata, vendor delegations, signing and
verification. Not built yet (see the open SDK/registry issue); nothing here is used."""
