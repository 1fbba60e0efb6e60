// Package ratelimitd asks a ratelimitd server whether a request may run now, and what is left.
//
// Check (CheckAndConsume) and Report (ReportUsage) carry a deadline on every attempt. An attempt
// that fails with UNAVAILABLE or DEADLINE_EXCEEDED is retried with the same request id, so a
// decision the server made but could not deliver is replayed, never charged twice. When every
// attempt fails, Check follows the fail-open or fail-closed choice instead of returning an error.
// Decision.HTTP and Middleware turn a decision into the HTTP answer an LLM API gives.
package ratelimitd

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	mathrand "math/rand/v2"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	pb "github.com/ratelimitd/ratelimitd/clients/go/gen/ratelimitd/v1"
)

// Options tune a Client; the zero value of each field takes the default in its comment.
type Options struct {
	Timeout  time.Duration // each attempt's deadline (500ms)
	Attempts int           // tries in all, with one request id (3)
	Backoff  time.Duration // first pause between tries, doubled each time (50ms)
	// FailOpen admits requests when ratelimitd cannot be asked; false refuses them with 503.
	FailOpen bool
	// Token is sent as `authorization: Bearer` metadata; needed only to decide by project.
	Token string
}

func (o Options) withDefaults() Options {
	if o.Timeout <= 0 {
		o.Timeout = 500 * time.Millisecond
	}
	if o.Attempts <= 0 {
		o.Attempts = 3
	}
	if o.Backoff < 0 {
		o.Backoff = 0
	} else if o.Backoff == 0 {
		o.Backoff = 50 * time.Millisecond
	}
	return o
}

// Client is safe for concurrent use.
type Client struct {
	rpc  pb.RateLimitServiceClient
	conn *grpc.ClientConn // nil when the caller owns the connection
	opts Options
}

// Dial connects to address (host:port). Without dial options the connection is plaintext; pass
// grpc.WithTransportCredentials for TLS, or interceptors.
func Dial(address string, opts Options, dialOptions ...grpc.DialOption) (*Client, error) {
	if len(dialOptions) == 0 {
		dialOptions = []grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials())}
	}
	conn, err := grpc.NewClient(address, dialOptions...)
	if err != nil {
		return nil, err
	}
	client := New(conn, opts)
	client.conn = conn
	return client, nil
}

// New wraps a connection the caller made and closes.
func New(conn grpc.ClientConnInterface, opts Options) *Client {
	return &Client{rpc: pb.NewRateLimitServiceClient(conn), opts: opts.withDefaults()}
}

// Close closes the connection Dial made.
func (c *Client) Close() error {
	if c.conn == nil {
		return nil
	}
	return c.conn.Close()
}

// CheckRequest is one question. RequestID may be empty: Check then makes a random one, and
// reuses it for its own retries.
type CheckRequest struct {
	APIKey    string
	Model     string
	Tokens    int64 // the reservation: prompt tokens + max_tokens
	Requests  int64 // 0 means 1
	RequestID string
}

// Decision is a CheckAndConsume answer, or the fail-open/fail-closed stand-in when none came
// (Unreachable, with the last error in Err).
type Decision struct {
	*pb.CheckResponse
	Unreachable bool
	Err         error
}

// Error is a status ratelimitd answered that retrying cannot fix (bad input, bad credential).
type Error struct {
	Code    codes.Code
	Message string
}

func (e *Error) Error() string { return fmt.Sprintf("ratelimitd: %s: %s", e.Code, e.Message) }

// NewRequestID returns a random request id: send a new one for each new request.
func NewRequestID() string {
	var b [16]byte
	_, _ = rand.Read(b[:]) // never fails (Go 1.24+)
	return "req_" + hex.EncodeToString(b[:])
}

// Check asks whether the request may run now and charges it if so.
func (c *Client) Check(ctx context.Context, req CheckRequest) (*Decision, error) {
	id := req.RequestID
	if id == "" {
		id = NewRequestID()
	}
	in := &pb.CheckRequest{
		Caller:    &pb.CheckRequest_ApiKey{ApiKey: req.APIKey},
		Model:     req.Model,
		Tokens:    req.Tokens,
		Requests:  req.Requests,
		RequestId: id,
	}
	out, err := retry(ctx, c, func(ctx context.Context) (*pb.CheckResponse, error) { return c.rpc.CheckAndConsume(ctx, in) })
	if err == nil {
		return &Decision{CheckResponse: out}, nil
	}
	if !retryable(err) {
		return nil, asError(err)
	}
	stand := &pb.CheckResponse{Allowed: c.opts.FailOpen, RequestId: id}
	return &Decision{CheckResponse: stand, Unreachable: true, Err: err}, nil
}

// Report tells what an admitted request really used; a retry of it is counted once.
func (c *Client) Report(ctx context.Context, req *pb.ReportUsageRequest) (*pb.ReportUsageResponse, error) {
	out, err := retry(ctx, c, func(ctx context.Context) (*pb.ReportUsageResponse, error) { return c.rpc.ReportUsage(ctx, req) })
	if err != nil {
		return nil, asError(err)
	}
	return out, nil
}

func retry[T any](ctx context.Context, c *Client, call func(context.Context) (T, error)) (T, error) {
	if c.opts.Token != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+c.opts.Token)
	}
	var zero T
	pause := c.opts.Backoff
	for attempt := 1; ; attempt++ {
		attemptCtx, cancel := context.WithTimeout(ctx, c.opts.Timeout)
		out, err := call(attemptCtx)
		cancel()
		if err == nil {
			return out, nil
		}
		if !retryable(err) || attempt == c.opts.Attempts || ctx.Err() != nil {
			return zero, err
		}
		jittered := time.Duration(float64(pause) * (0.5 + mathrand.Float64()))
		select {
		case <-time.After(jittered):
		case <-ctx.Done():
			return zero, err
		}
		pause *= 2
	}
}

// retryable: the answer did not arrive; the call may have been applied, and a retry with the
// same request id is exact either way.
func retryable(err error) bool {
	code := status.Code(err)
	return code == codes.Unavailable || code == codes.DeadlineExceeded
}

func asError(err error) error {
	var e *Error
	if errors.As(err, &e) {
		return e
	}
	st := status.Convert(err)
	return &Error{Code: st.Code(), Message: st.Message()}
}
