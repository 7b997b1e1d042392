"""SEVT_* event type constants (from Comet's SDKs) and name lookups."""

from __future__ import annotations

__all__ = ["JOB_STATUS_NAMES", "SEVT", "SEVT_NAMES", "job_status_name", "sevt_name"]

#: name -> number for every known StreamableEvent type (the range markers excluded).
SEVT: dict[str, int] = {
    "SEVT_META_HELLO": 4000,
    "SEVT_ACCOUNT_NEW": 4100,
    "SEVT_ACCOUNT_REMOVED": 4101,
    "SEVT_ACCOUNT_UPDATED": 4102,
    "SEVT_ACCOUNT_LOGIN": 4103,
    "SEVT_ACCOUNT_LOGIN_FAILED": 4104,
    "SEVT_ACCOUNT_SESSION_START": 4105,
    "SEVT_ACCOUNT_SESSION_REVOKE": 4106,
    "SEVT_ACCOUNT_SESSION_EXPIRE": 4107,
    "SEVT_ACCOUNT_ADMIN_NEW": 4150,
    "SEVT_ACCOUNT_ADMIN_REMOVED": 4151,
    "SEVT_ACCOUNT_ADMIN_UPDATED": 4152,
    "SEVT_ACCOUNT_ADMIN_LOGIN": 4153,
    "SEVT_ACCOUNT_ADMIN_LOGIN_FAILED": 4154,
    "SEVT_ACCOUNT_ADMIN_SESSION_START": 4155,
    "SEVT_ACCOUNT_ADMIN_SESSION_REVOKE": 4156,
    "SEVT_ACCOUNT_ADMIN_SESSION_EXPIRE": 4157,
    "SEVT_JOB_NEW": 4200,
    "SEVT_JOB_COMPLETED": 4201,
    "SEVT_BUCKET_NEW": 4300,
    "SEVT_BUCKET_REMOVED": 4301,
    "SEVT_SERVER_STARTED": 4400,
    "SEVT_SERVER_RESTARTED": 4401,
    "SEVT_SERVER_SHUTDOWN": 4402,
    "SEVT_SERVER_UPDATED": 4403,
    "SEVT_TENANT_NEW": 4500,
    "SEVT_TENANT_REMOVED": 4501,
    "SEVT_TENANT_UPDATED": 4502,
    "SEVT_POLICY_NEW": 4600,
    "SEVT_POLICY_REMOVED": 4601,
    "SEVT_POLICY_UPDATED": 4602,
    "SEVT_DEVICE_NEW": 4700,
    "SEVT_DEVICE_REMOVED": 4701,
    "SEVT_DEVICE_LIVE_CONNECT": 4702,
    "SEVT_DEVICE_LIVE_DISCONNECT": 4703,
    "SEVT_DEVICE_LOBBY_CONNECT": 4704,
    "SEVT_DEVICE_LOBBY_DISCONNECT": 4705,
    "SEVT_USERGROUP_NEW": 4800,
    "SEVT_USERGROUP_REMOVED": 4801,
    "SEVT_USERGROUP_UPDATED": 4802,
    "SEVT_SQUOTA_NEW": 4803,
    "SEVT_SQUOTA_REMOVED": 4804,
    "SEVT_SQUOTA_UPDATED": 4805,
}

#: number -> name for the known types.
SEVT_NAMES: dict[int, str] = {v: k for k, v in SEVT.items()}


def sevt_name(type_: int) -> str | None:
    """The SEVT_* name of a known event type, or None for a number this version does not know."""
    return SEVT_NAMES.get(type_)


#: JOB_STATUS_* values (BackupJobDetail.Status), from Comet's SDKs.
JOB_STATUS_NAMES: dict[int, str] = {
    5000: "JOB_STATUS_STOP_SUCCESS",
    6000: "JOB_STATUS_RUNNING_INDETERMINATE",
    6001: "JOB_STATUS_RUNNING_ACTIVE",
    6002: "JOB_STATUS_RUNNING_REVIVED",
    6003: "JOB_STATUS_RUNNING_TRYAGAIN",
    6004: "JOB_STATUS_NOT_YET_STARTED",
    7000: "JOB_STATUS_FAILED_TIMEOUT",
    7001: "JOB_STATUS_FAILED_WARNING",
    7002: "JOB_STATUS_FAILED_ERROR",
    7003: "JOB_STATUS_FAILED_QUOTA",
    7004: "JOB_STATUS_FAILED_SCHEDULEMISSED",
    7005: "JOB_STATUS_FAILED_CANCELLED",
    7006: "JOB_STATUS_FAILED_SKIPALREADYRUNNING",
    7007: "JOB_STATUS_FAILED_ABANDONED",
}


def job_status_name(status: object) -> str:
    """A bounded label for a job status: the known name, else the range it falls in, else "other"."""
    if isinstance(status, int) and not isinstance(status, bool):
        name = JOB_STATUS_NAMES.get(status)
        if name is not None:
            return name
        if 5000 <= status <= 5999:
            return "JOB_STATUS_STOP_SUCCESS_OTHER"
        if 6000 <= status <= 6999:
            return "JOB_STATUS_RUNNING_OTHER"
        if 7000 <= status <= 7999:
            return "JOB_STATUS_FAILED_OTHER"
    return "other"
