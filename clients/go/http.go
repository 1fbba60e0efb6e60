package ratelimitd

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"strings"

	"google.golang.org/grpc/codes"

	pb "github.com/ratelimitd/ratelimitd/clients/go/gen/ratelimitd/v1"
)

// refusal is one row of docs/api.md's refusal table (the server's ratelimitd/engine/outcomes.py).
type refusal struct {
	status int
	code   string
}

var refusals = map[pb.Reason]refusal{
	pb.Reason_REASON_PROJECT_LIMIT:       {http.StatusTooManyRequests, "rate_limit_exceeded"},
	pb.Reason_REASON_ORGANIZATION_LIMIT:  {http.StatusTooManyRequests, "rate_limit_exceeded"},
	pb.Reason_REASON_REQUEST_TOO_LARGE:   {http.StatusRequestEntityTooLarge, "request_too_large"},
	pb.Reason_REASON_INVALID_API_KEY:     {http.StatusUnauthorized, "invalid_api_key"},
	pb.Reason_REASON_MODEL_NOT_AVAILABLE: {http.StatusNotFound, "model_not_found"},
	pb.Reason_REASON_MODEL_BLOCKED:       {http.StatusForbidden, "model_blocked"},
	pb.Reason_REASON_SPEND_LIMIT:         {http.StatusBadRequest, "blocked_api_access"},
	pb.Reason_REASON_REQUEST_ID_REUSED:   {http.StatusConflict, "request_id_reused"},
	pb.Reason_REASON_STORAGE_UNAVAILABLE: {http.StatusServiceUnavailable, "service_unavailable"},
}

// Answer is the HTTP answer of a decision: Status 200 means "serve the request" (with Header).
type Answer struct {
	Status int
	Header http.Header
	Body   []byte
}

// HTTP returns 200 with the x-ratelimit-* headers when admitted, else the refusal's status
// (429, 413, 401, 403, ...), headers (retry-after on 429) and an OpenAI-style JSON error.
func (d *Decision) HTTP() Answer {
	header := http.Header{}
	for name, value := range d.GetHeaders() {
		header.Set(name, value)
	}
	if d.GetAllowed() {
		return Answer{Status: http.StatusOK, Header: header}
	}
	if d.Unreachable {
		return errorAnswer(header, http.StatusServiceUnavailable, "The rate limit service is unavailable.", "server_error", "service_unavailable")
	}
	row, ok := refusals[d.GetReason()]
	if !ok {
		row = refusal{http.StatusServiceUnavailable, "service_unavailable"}
	}
	errorType := "invalid_request_error"
	switch d.GetReason() {
	case pb.Reason_REASON_PROJECT_LIMIT, pb.Reason_REASON_ORGANIZATION_LIMIT, pb.Reason_REASON_REQUEST_TOO_LARGE:
		errorType = d.GetBinding().GetMetric()
	}
	return errorAnswer(header, row.status, d.GetMessage(), errorType, row.code)
}

// Write sends the answer; a 200 only sets its headers, for the handler to write the rest.
func (a Answer) Write(w http.ResponseWriter) {
	for name, values := range a.Header {
		w.Header()[name] = values
	}
	if a.Status != http.StatusOK {
		w.WriteHeader(a.Status)
		_, _ = w.Write(a.Body)
	}
}

func errorAnswer(header http.Header, status int, message, errorType, code string) Answer {
	body, _ := json.Marshal(map[string]any{"error": map[string]string{"message": message, "type": errorType, "code": code}})
	header.Set("Content-Type", "application/json")
	return Answer{Status: status, Header: header, Body: body}
}

type decisionKey struct{}

// DecisionFrom returns the decision Middleware made for this request (its RequestId is the one
// to Report usage with), or nil.
func DecisionFrom(ctx context.Context) *Decision {
	d, _ := ctx.Value(decisionKey{}).(*Decision)
	return d
}

// Describe names the model a request is for and the tokens to reserve (prompt + max_tokens).
type Describe func(*http.Request) (model string, tokens int64)

// Middleware asks ratelimitd before next runs. The API key is the request's
// `Authorization: Bearer` token. A refusal is answered here and never reaches next; an admitted
// request reaches next with the x-ratelimit-* headers set and the decision in its context.
func Middleware(client *Client, describe Describe) func(http.Handler) http.Handler {
	return func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			apiKey, ok := bearer(r)
			if !ok {
				message := "No API key provided. Send it in the Authorization header: `Authorization: Bearer YOUR_API_KEY`."
				errorAnswer(http.Header{}, http.StatusUnauthorized, message, "invalid_request_error", "invalid_api_key").Write(w)
				return
			}
			model, tokens := describe(r)
			decision, err := client.Check(r.Context(), CheckRequest{APIKey: apiKey, Model: model, Tokens: tokens})
			if err != nil {
				// Bad input the end user sent (an empty model) is theirs to fix; anything else
				// (a credential ratelimitd refuses) is this server's configuration.
				status, errorType, code := http.StatusInternalServerError, "server_error", "internal_error"
				var rlErr *Error
				if errors.As(err, &rlErr) && rlErr.Code == codes.InvalidArgument {
					status, errorType, code = http.StatusBadRequest, "invalid_request_error", "invalid_request"
				}
				errorAnswer(http.Header{}, status, err.Error(), errorType, code).Write(w)
				return
			}
			answer := decision.HTTP()
			answer.Write(w)
			if answer.Status == http.StatusOK {
				next.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), decisionKey{}, decision)))
			}
		})
	}
}

func bearer(r *http.Request) (string, bool) {
	scheme, token, found := strings.Cut(r.Header.Get("Authorization"), " ")
	token = strings.TrimSpace(token)
	return token, found && strings.EqualFold(scheme, "bearer") && token != ""
}
