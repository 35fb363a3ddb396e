from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SequenceQuery(_message.Message):
    __slots__ = ("sequence_id", "token_ids", "num_positions", "candidate_ids", "omitted_prefix_length", "position_candidates", "adapter")
    SEQUENCE_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    NUM_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_IDS_FIELD_NUMBER: _ClassVar[int]
    OMITTED_PREFIX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    POSITION_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    sequence_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    num_positions: int
    candidate_ids: _containers.RepeatedScalarFieldContainer[int]
    omitted_prefix_length: int
    position_candidates: _containers.RepeatedCompositeFieldContainer[CandidateList]
    adapter: str
    def __init__(self, sequence_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., num_positions: _Optional[int] = ..., candidate_ids: _Optional[_Iterable[int]] = ..., omitted_prefix_length: _Optional[int] = ..., position_candidates: _Optional[_Iterable[_Union[CandidateList, _Mapping]]] = ..., adapter: _Optional[str] = ...) -> None: ...

class CandidateList(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class NextTokenLogprobsRequest(_message.Message):
    __slots__ = ("sequences", "logprob_top_k", "deadline_unix_s")
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_TOP_K_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    sequences: _containers.RepeatedCompositeFieldContainer[SequenceQuery]
    logprob_top_k: int
    deadline_unix_s: float
    def __init__(self, sequences: _Optional[_Iterable[_Union[SequenceQuery, _Mapping]]] = ..., logprob_top_k: _Optional[int] = ..., deadline_unix_s: _Optional[float] = ...) -> None: ...

class PositionLogprobs(_message.Message):
    __slots__ = ("top_ids", "top_logprobs", "candidate_logprobs", "tail_logmass", "full_logprobs")
    TOP_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TAIL_LOGMASS_FIELD_NUMBER: _ClassVar[int]
    FULL_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    top_ids: _containers.RepeatedScalarFieldContainer[int]
    top_logprobs: _containers.RepeatedScalarFieldContainer[float]
    candidate_logprobs: _containers.RepeatedScalarFieldContainer[float]
    tail_logmass: float
    full_logprobs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, top_ids: _Optional[_Iterable[int]] = ..., top_logprobs: _Optional[_Iterable[float]] = ..., candidate_logprobs: _Optional[_Iterable[float]] = ..., tail_logmass: _Optional[float] = ..., full_logprobs: _Optional[_Iterable[float]] = ...) -> None: ...

class SequenceResult(_message.Message):
    __slots__ = ("positions", "cached_tokens", "model_fingerprint")
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    positions: _containers.RepeatedCompositeFieldContainer[PositionLogprobs]
    cached_tokens: int
    model_fingerprint: str
    def __init__(self, positions: _Optional[_Iterable[_Union[PositionLogprobs, _Mapping]]] = ..., cached_tokens: _Optional[int] = ..., model_fingerprint: _Optional[str] = ...) -> None: ...

class NextTokenLogprobsResponse(_message.Message):
    __slots__ = ("sequences", "model_fingerprint", "replica_id")
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    sequences: _containers.RepeatedCompositeFieldContainer[SequenceResult]
    model_fingerprint: str
    replica_id: str
    def __init__(self, sequences: _Optional[_Iterable[_Union[SequenceResult, _Mapping]]] = ..., model_fingerprint: _Optional[str] = ..., replica_id: _Optional[str] = ...) -> None: ...

class DraftQuery(_message.Message):
    __slots__ = ("sequence_id", "token_ids", "num_tokens", "adapter")
    SEQUENCE_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    sequence_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    num_tokens: int
    adapter: str
    def __init__(self, sequence_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., num_tokens: _Optional[int] = ..., adapter: _Optional[str] = ...) -> None: ...

class DraftRequest(_message.Message):
    __slots__ = ("sequences", "deadline_unix_s", "score_logprob_top_k")
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    SCORE_LOGPROB_TOP_K_FIELD_NUMBER: _ClassVar[int]
    sequences: _containers.RepeatedCompositeFieldContainer[DraftQuery]
    deadline_unix_s: float
    score_logprob_top_k: int
    def __init__(self, sequences: _Optional[_Iterable[_Union[DraftQuery, _Mapping]]] = ..., deadline_unix_s: _Optional[float] = ..., score_logprob_top_k: _Optional[int] = ...) -> None: ...

class DraftSequence(_message.Message):
    __slots__ = ("token_ids", "scores")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    scores: SequenceResult
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., scores: _Optional[_Union[SequenceResult, _Mapping]] = ...) -> None: ...

class DraftResponse(_message.Message):
    __slots__ = ("sequences",)
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    sequences: _containers.RepeatedCompositeFieldContainer[DraftSequence]
    def __init__(self, sequences: _Optional[_Iterable[_Union[DraftSequence, _Mapping]]] = ...) -> None: ...

class PoolInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "role", "vocab_size", "max_context", "eos_token_id", "vocab_fingerprint", "model_fingerprint", "dtype", "device", "num_parameters", "adapter_fingerprints", "head_rows", "stop_token_ids")
    class AdapterFingerprintsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    VOCAB_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    NUM_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FINGERPRINTS_FIELD_NUMBER: _ClassVar[int]
    HEAD_ROWS_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    name: str
    role: str
    vocab_size: int
    max_context: int
    eos_token_id: int
    vocab_fingerprint: str
    model_fingerprint: str
    dtype: str
    device: str
    num_parameters: int
    adapter_fingerprints: _containers.ScalarMap[str, str]
    head_rows: int
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., role: _Optional[str] = ..., vocab_size: _Optional[int] = ..., max_context: _Optional[int] = ..., eos_token_id: _Optional[int] = ..., vocab_fingerprint: _Optional[str] = ..., model_fingerprint: _Optional[str] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., num_parameters: _Optional[int] = ..., adapter_fingerprints: _Optional[_Mapping[str, str]] = ..., head_rows: _Optional[int] = ..., stop_token_ids: _Optional[_Iterable[int]] = ...) -> None: ...
