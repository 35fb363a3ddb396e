"""Names shared by the Serve builder, the deployments and the clients."""

POOL_DEPLOYMENT = "ModelPool"
COORDINATOR_DEPLOYMENT = "Coordinator"
COORDINATOR_APP = "eft"


def pool_app_name(role: str) -> str:
    return f"pool-{role}"
