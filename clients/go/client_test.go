package ratelimitd_test

// Run by tests/test_clients.py against a live server: the organization's `*` limit gives every
// model its own bucket of 2 requests and 1,000 tokens a minute on a stopped clock, so each test
// asks for a model of its own and counts exactly.

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	ratelimitd "github.com/ratelimitd/ratelimitd/clients/go"
	pb "github.com/ratelimitd/ratelimitd/clients/go/gen/ratelimitd/v1"
)

func live(t *testing.T) (address, key string) {
	address, key = os.Getenv("RATELIMITD_TEST_ADDRESS"), os.Getenv("RATELIMITD_TEST_KEY_GO")
	if address == "" {
		t.Skip("run by tests/test_clients.py, which starts a live server")
	}
	return address, key
}

func freshModel() string {
	var b [6]byte
	_, _ = rand.Read(b[:])
	return "go-" + hex.EncodeToString(b[:])
}

func dial(t *testing.T, address string, opts ratelimitd.Options, dialOptions ...grpc.DialOption) *ratelimitd.Client {
	client, err := ratelimitd.Dial(address, opts, dialOptions...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = client.Close() })
	return client
}

func check(t *testing.T, client *ratelimitd.Client, req ratelimitd.CheckRequest) *ratelimitd.Decision {
	decision, err := client.Check(context.Background(), req)
	if err != nil {
		t.Fatal(err)
	}
	return decision
}

func errorCode(t *testing.T, body []byte) string {
	var parsed struct{ Error struct{ Code, Type string } }
	if err := json.Unmarshal(body, &parsed); err != nil {
		t.Fatalf("body %q: %v", body, err)
	}
	return parsed.Error.Code
}

func TestAdmittedRequestCarriesRateLimitHeaders(t *testing.T) {
	address, key := live(t)
	decision := check(t, dial(t, address, ratelimitd.Options{}), ratelimitd.CheckRequest{APIKey: key, Model: freshModel(), Tokens: 100})
	answer := decision.HTTP()
	if !decision.GetAllowed() || decision.GetReason() != pb.Reason_REASON_ALLOWED || answer.Status != 200 {
		t.Fatalf("want admitted, got %v", decision)
	}
	if got := answer.Header.Get("x-ratelimit-remaining-requests"); got != "1" {
		t.Errorf("x-ratelimit-remaining-requests = %q, want 1", got)
	}
	if got := answer.Header.Get("x-ratelimit-remaining-tokens"); got != "900" {
		t.Errorf("x-ratelimit-remaining-tokens = %q, want 900", got)
	}
}

func TestRefusalsBecome429And413And401(t *testing.T) {
	address, key := live(t)
	client := dial(t, address, ratelimitd.Options{})
	model := freshModel()
	for range 2 {
		check(t, client, ratelimitd.CheckRequest{APIKey: key, Model: model})
	}
	limited := check(t, client, ratelimitd.CheckRequest{APIKey: key, Model: model}).HTTP()
	if limited.Status != 429 || limited.Header.Get("retry-after") == "" || errorCode(t, limited.Body) != "rate_limit_exceeded" {
		t.Errorf("third request: %d %v %s", limited.Status, limited.Header, limited.Body)
	}
	if got := check(t, client, ratelimitd.CheckRequest{APIKey: key, Model: freshModel(), Tokens: 1001}).HTTP().Status; got != 413 {
		t.Errorf("too large: %d, want 413", got)
	}
	if got := check(t, client, ratelimitd.CheckRequest{APIKey: "rl_not-a-key", Model: freshModel()}).HTTP().Status; got != 401 {
		t.Errorf("bad key: %d, want 401", got)
	}
}

func TestLostAnswerIsRetriedWithSameRequestIDAndChargedOnce(t *testing.T) {
	address, key := live(t)
	var ids []string
	// The call reaches the server and is decided, but its answer is lost once: what a timeout
	// or a dropped connection after sending looks like to the caller.
	loseFirst := func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
		ids = append(ids, req.(*pb.CheckRequest).GetRequestId())
		err := invoker(ctx, method, req, reply, cc, opts...)
		if len(ids) == 1 && err == nil {
			return status.Error(codes.Unavailable, "connection lost after the call was sent")
		}
		return err
	}
	client := dial(t, address, ratelimitd.Options{Backoff: -1},
		grpc.WithTransportCredentials(insecure.NewCredentials()), grpc.WithUnaryInterceptor(loseFirst))
	model := freshModel()
	decision := check(t, client, ratelimitd.CheckRequest{APIKey: key, Model: model})
	if !decision.GetAllowed() || !decision.GetReplayed() || len(ids) != 2 || ids[0] != ids[1] || ids[0] != decision.GetRequestId() {
		t.Fatalf("retry: decision %v, request ids %v", decision, ids)
	}
	// charged once: of 2 requests, one more fits, then none
	second := check(t, client, ratelimitd.CheckRequest{APIKey: key, Model: model}).GetAllowed()
	third := check(t, client, ratelimitd.CheckRequest{APIKey: key, Model: model}).GetAllowed()
	if !second || third {
		t.Errorf("after the retry: second %v, third %v; want true, false", second, third)
	}
}

func TestUnreachableServiceFailsOpenOrClosedAsChosen(t *testing.T) {
	_, key := live(t)
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	unused := listener.Addr().String()
	_ = listener.Close()
	for _, failOpen := range []bool{true, false} {
		client := dial(t, unused, ratelimitd.Options{Attempts: 2, Backoff: -1, FailOpen: failOpen})
		decision := check(t, client, ratelimitd.CheckRequest{APIKey: key, Model: freshModel()})
		want := map[bool]int{true: 200, false: 503}[failOpen]
		if !decision.Unreachable || decision.GetAllowed() != failOpen || decision.HTTP().Status != want {
			t.Errorf("FailOpen=%v: unreachable %v allowed %v status %d", failOpen, decision.Unreachable, decision.GetAllowed(), decision.HTTP().Status)
		}
	}
}

func TestBadInputIsAnErrorWithTheServersStatus(t *testing.T) {
	address, key := live(t)
	_, err := dial(t, address, ratelimitd.Options{}).Check(context.Background(), ratelimitd.CheckRequest{APIKey: key})
	var rlErr *ratelimitd.Error
	if !errors.As(err, &rlErr) || rlErr.Code != codes.InvalidArgument {
		t.Fatalf("empty model: %v, want InvalidArgument", err)
	}
}

func TestReportReconcilesOnce(t *testing.T) {
	address, key := live(t)
	client := dial(t, address, ratelimitd.Options{})
	decision := check(t, client, ratelimitd.CheckRequest{APIKey: key, Model: freshModel(), Tokens: 500})
	report := &pb.ReportUsageRequest{Caller: &pb.ReportUsageRequest_ApiKey{ApiKey: key}, RequestId: decision.GetRequestId(), InputTokens: 100, OutputTokens: 50}
	first, err := client.Report(context.Background(), report)
	if err != nil {
		t.Fatal(err)
	}
	again, err := client.Report(context.Background(), report)
	if err != nil {
		t.Fatal(err)
	}
	if first.GetResult() != pb.ReportUsageResponse_RESULT_RECONCILED || first.GetTokenDelta() != -350 || again.GetResult() != pb.ReportUsageResponse_RESULT_DUPLICATE {
		t.Errorf("reports: %v then %v", first, again)
	}
}

func TestMiddlewareServesAdmittedRequestsAndAnswersRefusals(t *testing.T) {
	address, key := live(t)
	model := freshModel()
	var reached []string
	handler := ratelimitd.Middleware(dial(t, address, ratelimitd.Options{}), func(*http.Request) (string, int64) { return model, 10 })(
		http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			reached = append(reached, ratelimitd.DecisionFrom(r.Context()).GetRequestId())
			_, _ = w.Write([]byte("ok"))
		}))
	serve := func(authorization string) *httptest.ResponseRecorder {
		r := httptest.NewRequest("POST", "/v1/chat/completions", nil)
		if authorization != "" {
			r.Header.Set("Authorization", authorization)
		}
		w := httptest.NewRecorder()
		handler.ServeHTTP(w, r)
		return w
	}
	answers := []*httptest.ResponseRecorder{serve("Bearer " + key), serve("Bearer " + key), serve("Bearer " + key)}
	if answers[0].Code != 200 || answers[1].Code != 200 || answers[2].Code != 429 || len(reached) != 2 {
		t.Fatalf("statuses %d %d %d, handler reached %d times", answers[0].Code, answers[1].Code, answers[2].Code, len(reached))
	}
	if answers[1].Header().Get("x-ratelimit-remaining-requests") != "0" || answers[1].Body.String() != "ok" {
		t.Errorf("admitted: %v %q", answers[1].Header(), answers[1].Body)
	}
	if answers[2].Header().Get("retry-after") == "" || errorCode(t, answers[2].Body.Bytes()) != "rate_limit_exceeded" {
		t.Errorf("refused: %v %q", answers[2].Header(), answers[2].Body)
	}
	if missing := serve(""); missing.Code != 401 || errorCode(t, missing.Body.Bytes()) != "invalid_api_key" {
		t.Errorf("no key: %d %q", missing.Code, missing.Body)
	}
}
